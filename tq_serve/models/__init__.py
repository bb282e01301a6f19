"""Models the project builds itself: the bundled `tq-tiny` code model and the script that trains it."""
