"""The wire protocol: request and response models (`schemas`, `jobs`) and the error envelope
(`errors`). Imported by the front ends, the services, the jobs and the client alike; it imports
nothing of theirs. Users import these types from `serve_app.types`, their stable public home."""
