class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the field."""

    def __init__(self, file: object, message: str):
        super().__init__(f"{file}: {message}")
        self.file = str(file)
