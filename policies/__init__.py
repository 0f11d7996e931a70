"""Shipped policies (``*.kvp``) and calibration artifacts (``*.json``).

Load one by name with ``kvpolicy.load("ems")``; list them with
``kvpolicy.registry.shipped_names()``.
"""
