"""Jobs -> sockets: route each event once, encode its frame once, hand it to every recipient."""
