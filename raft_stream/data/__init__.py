"""Models and data for the demo and the tests: the tiny test model, the converted demo
model, prompt files and the Rotten Tomatoes snippets."""
