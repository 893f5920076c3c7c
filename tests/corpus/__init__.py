"""Test messages: mikel-mail/ and cpython/ real-world samples, tricky.py synthetic ones."""
