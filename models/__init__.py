"""Models served by the dataflows: a registry of names, versions and input schemas."""
