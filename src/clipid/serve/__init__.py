"""``clipid serve``: a search web app over the gallery indexes of the ``index`` stage."""
