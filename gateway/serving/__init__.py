"""The listener, the sockets, the HTTP routes and the tasks that sweep over every socket."""
