"""Ray programs (scoring, training) and the ``clipn`` CLI. They define no model maths."""
