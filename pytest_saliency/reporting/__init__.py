"""Reporting: the JSON and HTML reports and the figures of every check result."""
