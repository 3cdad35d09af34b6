"""Ray-side workers of a sweep: actors that hold a loaded pair and run trial after trial on it."""
