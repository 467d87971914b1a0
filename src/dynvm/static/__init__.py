"""Existing machines handed out whole: ``[staticN]`` sections."""
