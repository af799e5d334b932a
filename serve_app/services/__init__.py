"""What every interface calls: the image, score and video services, built one way by
`Services.build(settings, handles)` (`facade`) from the settings read once from the config
(`settings`); the generate-score-regenerate graph, and request validation that depends on the
model (`validation`)."""
