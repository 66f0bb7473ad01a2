"""The tokenizer kinds by name, and whether each is fitted to data.

Read by the config's validation and the fit-tokenizer command line, which answer before torch is
imported; `tokenizers/__init__.py` maps each name to its code and checks it covers exactly these.
"""

FITTED: dict[str, bool] = {"pca": True, "pixel": False, "patch-ae": True, "patch-vae": True, "conv-vae": True}
KINDS: tuple[str, ...] = tuple(FITTED)
FIT_KINDS: tuple[str, ...] = tuple(k for k, fitted in FITTED.items() if fitted)
