"""Code that several tuners share."""
