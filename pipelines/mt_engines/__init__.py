"""Machine-translation engines for the translate stage (`base.py` holds the protocol and the
factory; `chat.py` the LLM prompt and answer cleaning; `quality.py` the per-row quality signals)."""
