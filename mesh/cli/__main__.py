"""``python -m mesh.cli``: the ``mesh`` command."""

import signal

from mesh.cli import main

if __name__ == "__main__":
    # Printing into a closed pipe (mesh agents | head) ends quietly, as other CLI tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
