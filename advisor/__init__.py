"""The platform's own advice: which pattern a use case needs (``patternflow advise``)."""
