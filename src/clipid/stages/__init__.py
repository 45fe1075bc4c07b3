"""One entry point per DVC stage; ``clipid <stage>`` calls them."""
