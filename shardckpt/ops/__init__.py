"""Operations on a saved checkpoint: export to Hugging Face / safetensors / a plain state dict
(``export``) and copy between roots and stores (``copy``)."""
