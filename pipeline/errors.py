"""The one error type a person sees: bad input, with a message they can act on."""


class InputError(ValueError):
    """Bad input (image, question, budget, model name). The session stays usable after it."""


class ModelUnavailable(InputError):
    """A model could not be loaded (unknown name, no network and no cached copy)."""
