"""PN532 host-protocol facts (NXP PN532 User Manual UM0701-02): command codes, status codes,
and the CIU registers drivers use for transparent mode. Shared by the driver and the emulator
so both sides speak from one table."""

from __future__ import annotations

from enum import IntEnum

TFI_HOST = 0xD4  # frame from the host controller to the PN532
TFI_CHIP = 0xD5  # frame from the PN532 to the host
TFI_ERROR = 0x7F  # the specific application-level error frame

IC_PN532 = 0x32
FIRMWARE_VERSION = bytes((IC_PN532, 0x01, 0x06, 0x07))  # IC, Ver, Rev, Support


class Command(IntEnum):
    """Command codes (the response carries the code + 1)."""

    DIAGNOSE = 0x00
    GET_FIRMWARE_VERSION = 0x02
    GET_GENERAL_STATUS = 0x04
    READ_REGISTER = 0x06
    WRITE_REGISTER = 0x08
    READ_GPIO = 0x0C
    WRITE_GPIO = 0x0E
    SET_SERIAL_BAUD_RATE = 0x10
    SET_PARAMETERS = 0x12
    SAM_CONFIGURATION = 0x14
    POWER_DOWN = 0x16
    RF_CONFIGURATION = 0x32
    IN_DATA_EXCHANGE = 0x40
    IN_COMMUNICATE_THRU = 0x42
    IN_DESELECT = 0x44
    IN_LIST_PASSIVE_TARGET = 0x4A
    IN_PSL = 0x4E
    IN_ATR = 0x50
    IN_RELEASE = 0x52
    IN_SELECT = 0x54
    IN_JUMP_FOR_DEP = 0x56
    IN_AUTO_POLL = 0x60


class Status(IntEnum):
    """Error codes in the low 6 bits of a response's status byte (0 = success)."""

    OK = 0x00
    TIMEOUT = 0x01
    CRC_ERROR = 0x02
    PARITY_ERROR = 0x03
    BIT_COUNT_ERROR = 0x04
    FRAMING_ERROR = 0x05
    COLLISION = 0x06
    BUFFER_TOO_SMALL = 0x07
    RF_BUFFER_OVERFLOW = 0x09
    RF_FIELD_TIMEOUT = 0x0A
    RF_PROTOCOL_ERROR = 0x0B
    OVERHEATING = 0x0D
    INTERNAL_BUFFER_OVERFLOW = 0x0E
    INVALID_PARAMETER = 0x10
    DEP_UNSUPPORTED_COMMAND = 0x12
    DEP_INVALID_FORMAT = 0x13
    MIFARE_AUTH_ERROR = 0x14
    WRONG_UID_CHECK_BYTE = 0x23
    INVALID_DEVICE_STATE = 0x25
    OPERATION_NOT_ALLOWED = 0x26
    COMMAND_NOT_ACCEPTABLE = 0x27
    TARGET_RELEASED = 0x29
    CARD_ID_MISMATCH = 0x2A
    CARD_DISAPPEARED = 0x2B
    NFCID3_MISMATCH = 0x2C
    OVER_CURRENT = 0x2D
    NAD_MISSING = 0x2E


STATUS_MESSAGES = {
    Status.TIMEOUT: "the card did not answer (timeout): card removed or out of range",
    Status.CRC_ERROR: "CRC error in the card's answer: bad coupling or interference",
    Status.PARITY_ERROR: "parity error in the card's answer: bad coupling or wrong key stream",
    Status.BIT_COUNT_ERROR: "wrong bit count during anticollision",
    Status.FRAMING_ERROR: "framing error in the card's answer",
    Status.COLLISION: "abnormal bit collision: two cards in the field?",
    Status.BUFFER_TOO_SMALL: "communication buffer too small",
    Status.RF_BUFFER_OVERFLOW: "RF buffer overflow",
    Status.RF_FIELD_TIMEOUT: "RF field not switched on in time",
    Status.RF_PROTOCOL_ERROR: "RF protocol error",
    Status.OVERHEATING: "the reader chip is overheating",
    Status.INTERNAL_BUFFER_OVERFLOW: "internal buffer overflow",
    Status.INVALID_PARAMETER: "invalid parameter in the command",
    Status.DEP_UNSUPPORTED_COMMAND: "command not supported by the target",
    Status.DEP_INVALID_FORMAT: "invalid data format from the target",
    Status.MIFARE_AUTH_ERROR: "MIFARE authentication failed (wrong key), or the card refused",
    Status.WRONG_UID_CHECK_BYTE: "wrong UID check byte (BCC) during anticollision",
    Status.INVALID_DEVICE_STATE: "invalid device state for this command",
    Status.OPERATION_NOT_ALLOWED: "operation not allowed in this configuration",
    Status.COMMAND_NOT_ACCEPTABLE: "command not acceptable in the current context",
    Status.TARGET_RELEASED: "the target was released",
    Status.CARD_ID_MISMATCH: "card ID mismatch: the card was exchanged",
    Status.CARD_DISAPPEARED: "the card disappeared from the field",
    Status.NFCID3_MISMATCH: "NFCID3 mismatch",
    Status.OVER_CURRENT: "over-current on the antenna driver",
    Status.NAD_MISSING: "NAD missing in DEP frame",
}

STATUS_ERROR_MASK = 0x3F  # bit 6 = MI (more information), bit 7 = NAD present


def describe_status(status: int) -> str:
    code = status & STATUS_ERROR_MASK
    try:
        return f"0x{code:02X} {STATUS_MESSAGES[Status(code)]}"
    except (ValueError, KeyError):
        return f"0x{code:02X} unknown PN532 error"


class Register(IntEnum):
    """CIU registers (contactless interface unit) in the PN532's SFR address space."""

    CIU_MODE = 0x6301
    CIU_TX_MODE = 0x6302  # bit 7 TxCRCEn
    CIU_RX_MODE = 0x6303  # bit 7 RxCRCEn
    CIU_TX_CONTROL = 0x6304
    CIU_MANUAL_RCV = 0x630D  # bit 4 ParityDisable
    CIU_COMMAND = 0x6331
    CIU_COMM_IEN = 0x6332
    CIU_DIV_IEN = 0x6333
    CIU_COMM_IRQ = 0x6334
    CIU_DIV_IRQ = 0x6335
    CIU_ERROR = 0x6336
    CIU_STATUS1 = 0x6337
    CIU_STATUS2 = 0x6338  # bit 3 MFCrypto1On
    CIU_FIFO_DATA = 0x6339
    CIU_FIFO_LEVEL = 0x633A
    CIU_WATER_LEVEL = 0x633B
    CIU_CONTROL = 0x633C  # bits 0..2 RxLastBits
    CIU_BIT_FRAMING = 0x633D  # bits 0..2 TxLastBits, bits 4..6 RxAlign
    CIU_COLL = 0x633E


TX_CRC_EN = 0x80
RX_CRC_EN = 0x80
PARITY_DISABLE = 0x10
MF_CRYPTO1_ON = 0x08
LAST_BITS_MASK = 0x07


class RFConfigItem(IntEnum):
    """CfgItem values of RFConfiguration."""

    RF_FIELD = 0x01
    VARIOUS_TIMINGS = 0x02
    MAX_RTY_COM = 0x04
    MAX_RETRIES = 0x05  # MxRtyATR, MxRtyPSL, MxRtyPassiveActivation
    ANALOG_106A = 0x0A
    ANALOG_212_424 = 0x0B
    ANALOG_TYPE_B = 0x0C
    ANALOG_ISO_DEP = 0x0D


BRTY_106A = 0x00  # InListPassiveTarget baud rate/modulation: 106 kbps type A
