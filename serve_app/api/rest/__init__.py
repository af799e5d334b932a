"""The genserve HTTP API, one router per resource. Each route translates HTTP to a service call and
back; the logic is in `serve_app.services`, the checks in `serve_app.services.validation`."""
