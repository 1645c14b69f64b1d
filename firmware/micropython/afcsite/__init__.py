"""afcsite: the camera-site monitor that runs on a roadside cabinet's microcontroller.

It watches the KGYS/EDS/PTS cameras in the cabinet (RTSP OPTIONS and ONVIF
GetSystemDateAndTime) and the cabinet itself (temperature, humidity, door, mains/UPS), and
reports to the center over MQTT with the topics of docs/protocol.md. MicroPython only: the
same files run on an ESP32 and, for tests, on the MicroPython unix port.
"""

VERSION = "0.1.0"
SW = "afcsite/" + VERSION
KIND = "camera-site"
