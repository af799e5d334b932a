"""Video: the SvdGenerator deployment and MP4/GIF/WebP encoding."""
