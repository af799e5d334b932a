"""The HTTP surface: the Ingress deployment, the FastAPI app and its routers, wire schemas, errors."""
