"""The Composer adapter layer: ComposerModel, the TREAD Algorithm, callbacks and the trainer builder."""
