"""One module per worker role; each is a FastStream app: `faststream run workers.<role>:app`."""
