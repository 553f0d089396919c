"""Every change tread_scale makes to the internals of Composer and mosaicml-streaming, one module each.

Both libraries are frozen at the versions pinned in ``requirements.lock`` (Composer 0.32.1, unmaintained
since 2025-07; streaming 0.13.0). Each module checks on import that the installed version is the one it
was written for, and each patch says what upstream does, what we change and why. Nothing outside this
package touches a private attribute of either library (``tests/test_layers.py`` checks).
"""
