"""Who may connect and what they may see: admission, revocation, sector assignments."""
