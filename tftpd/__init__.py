"""tftpd: a preforked TFTP server for network-boot storms."""

__version__ = "0.1.0"
