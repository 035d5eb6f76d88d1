"""A package only the coordinator container has (/coord-lib): shipped to the
workers by the environment of udfs/shipped_package.py."""

from coord_pkg.bonus import add_bonus

__all__ = ["add_bonus"]
