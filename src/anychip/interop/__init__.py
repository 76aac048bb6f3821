"""Use what you trained elsewhere: Hugging Face import and export."""
