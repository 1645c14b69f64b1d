"""The PN532 reader: host protocol codec (sans-I/O), transports opened by URL, the driver."""
