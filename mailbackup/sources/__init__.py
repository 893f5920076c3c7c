"""Where mail comes from: an IMAP account (imap.py) or a POP3 maildrop (pop3.py)."""
