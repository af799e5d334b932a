"""The OpenAI Images API over genserve: the wire protocol (`protocol`) and its routes (`routes`)."""
