"""The REST API's routes, one module per resource; each endpoint's docstring holds its
OpenAPI operation (YAML after ``---``, read by Starlette's ``SchemaGenerator``)."""
