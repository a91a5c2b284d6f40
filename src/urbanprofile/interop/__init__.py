"""Interoperability with other toolkits' conventions (srai), above the method registry."""
