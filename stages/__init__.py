"""One module per stage, each a single `run(recipe) -> Path` that reads top to bottom:
recipe -> data -> models -> loop -> artifact + manifest."""
