"""Exceptions raised by gradpress. Each message names the problem and the fix."""

from __future__ import annotations


class GradpressError(Exception):
    """Base class of every gradpress error."""


class PayloadError(GradpressError, ValueError):
    """Bytes that are not a valid gradpress payload (truncated, extended, garbled)."""


class NonFiniteGradientError(GradpressError, ValueError):
    """A gradient with NaN or Inf entries was given to a compressor or feedback."""


class PeerError(GradpressError, RuntimeError):
    """A distributed peer failed, stalled or sent something unusable."""
