# The image of every mesh process (deploy/k8s): `mesh run`, `mesh gateway`, `mesh bridge`,
# `mesh provision`.  Build: docker build -t agentmesh .  Agents of your own: FROM agentmesh,
# then COPY your modules into /app (the working directory `mesh run module:Class` imports from).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies in a layer of their own: a change to the code does not reinstall them.
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
lines = (l.split('#')[0].strip() for l in c['options']['install_requires'].splitlines()); \
print('\n'.join(l for l in lines if l))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY mesh ./mesh
COPY behaviours ./behaviours
COPY examples ./examples
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent mesh

# Non-root, the uid the manifests' securityContext names; the root filesystem may be
# read-only (the manifests mount an emptyDir at /tmp).
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["mesh"]
CMD ["--help"]
