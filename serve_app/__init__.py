"""genserve: the application wiring, HTTP ingress and generation graph on Ray Serve."""

APP_NAME = "genserve"
