"""Video: MP4/GIF/WebP encoding and frame interpolation (the deployment is deployments.video_generator)."""
