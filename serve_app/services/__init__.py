"""What every interface calls: the image, score and video services, the generate-score-regenerate
graph, and request validation that depends on the model (`validation`)."""
