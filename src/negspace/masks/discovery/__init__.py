"""Artifact discovery, one module per piece: :mod:`.common` (data, score factors, example choice),
:mod:`.candidate` (:class:`Candidate`, :func:`save_candidates`), and one module per method: :mod:`.channels`,
:mod:`.codec`, :mod:`.spray`. The entry point is :func:`negspace.masks.discover.discover_artifacts`."""
