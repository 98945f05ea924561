"""All SQL lives in repositories; workers and the api call these, never write queries inline."""
