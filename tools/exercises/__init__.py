"""Exercises made from this project's own code, with graders: `python -m tools.exercises -h`.

catalogue.py holds the list (data: the functions to write, statements, hints; the experiments and
their measured answers); blank.py makes a student's copy; graders/ holds one pytest file per
exercise, run by `python -m tools.exercises check` inside the copy it grades; read_back.py is the
measurement of the read-back experiment. docs/instructor.md tells how to use them in class.
"""
