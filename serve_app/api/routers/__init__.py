"""One router per resource. Each route translates HTTP to a service call and back; the logic is in
`serve_app.services`, the validation in the request models and `serve_app.services.validation`."""

from serve_app.api.routers import admin, catalog, health, images, jobs, openai_images, scores, videos

ROUTERS = (images.router, videos.router, scores.router, jobs.router, catalog.router, health.router,
           openai_images.router, admin.router)
