"""After training: ``compare`` runs a method matrix and tabulates it, ``report`` writes the study
tables, ``plots`` draws the curves. Nothing here trains."""
