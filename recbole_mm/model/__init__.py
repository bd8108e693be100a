"""recbole-mm models, organised by type as in RecBole."""
