import CUSB
import Foundation
import Synchronization

/// A Tegra recovery device opened through libusb: first bulk IN/OUT endpoints of the active
/// configuration, their interface claimed.
public final class LibUSBTransport: USBTransport {
    public let productID: UInt16
    public let location: String
    public let busNumber: UInt8
    public let deviceAddress: UInt8
    public let portPath: [UInt8]
    private var context: OpaquePointer?
    private var handle: OpaquePointer?
    private let interfaceNumber: Int32
    private let endpointIn: UInt8
    private let endpointOut: UInt8

    /// Takes ownership of `context` on success; on failure the caller still owns it.
    init(context: OpaquePointer, device: OpaquePointer, productID: UInt16) throws {
        self.context = context
        self.productID = productID
        busNumber = libusb_get_bus_number(device)
        deviceAddress = libusb_get_device_address(device)
        var ports = [UInt8](repeating: 0, count: 8)
        let portCount = libusb_get_port_numbers(device, &ports, Int32(ports.count))
        portPath = portCount > 0 ? Array(ports.prefix(Int(portCount))) : []
        let node = String(format: "/dev/bus/usb/%03d/%03d", busNumber, deviceAddress)
        location = "bus \(busNumber) device \(deviceAddress) (\(String(format: "%04x:%04x", TegraChip.vendorID, productID)), \(node))"

        let endpoints: (interface: Int32, input: UInt8, output: UInt8)
        do {
            endpoints = try Self.firstBulkEndpoints(device, location: location)
        } catch {
            self.context = nil
            throw error
        }
        interfaceNumber = endpoints.interface
        endpointIn = endpoints.input
        endpointOut = endpoints.output

        var opened: OpaquePointer?
        let openResult = libusb_open(device, &opened)
        guard openResult == 0, let opened else {
            self.context = nil
            throw LibUSB.error(openResult, "open", location: location, node: node)
        }
        handle = opened
        // A kernel driver would own the interface; Tegra recovery has none, so only detach
        // when one is really bound (blind auto-detach fails where USBDEVFS_DISCONNECT is missing).
        if libusb_kernel_driver_active(opened, endpoints.interface) == 1 {
            _ = libusb_detach_kernel_driver(opened, endpoints.interface)
        }
        let claimResult = libusb_claim_interface(opened, endpoints.interface)
        guard claimResult == 0 else {
            libusb_close(opened)
            handle = nil
            self.context = nil
            throw LibUSB.error(claimResult, "claim interface \(endpoints.interface) of", location: location, node: node)
        }
    }

    deinit { close() }

    /// The first bulk IN and first bulk OUT endpoint of the active configuration (no fixed addresses).
    static func firstBulkEndpoints(_ device: OpaquePointer, location: String) throws -> (interface: Int32, input: UInt8, output: UInt8) {
        var config: UnsafeMutablePointer<libusb_config_descriptor>?
        let result = libusb_get_active_config_descriptor(device, &config)
        guard result == 0, let config else {
            throw LibUSB.error(result, "read the active configuration of", location: location, node: nil)
        }
        defer { libusb_free_config_descriptor(config) }
        var input: (Int32, UInt8)?
        var output: (Int32, UInt8)?
        for i in 0..<Int(config.pointee.bNumInterfaces) {
            let interface = config.pointee.interface[i]
            for a in 0..<Int(interface.num_altsetting) {
                let setting = interface.altsetting[a]
                for e in 0..<Int(setting.bNumEndpoints) {
                    let endpoint = setting.endpoint[e]
                    guard endpoint.bmAttributes & 0x3 == UInt8(LIBUSB_TRANSFER_TYPE_BULK.rawValue) else { continue }
                    if endpoint.bEndpointAddress & 0x80 != 0 {
                        if input == nil { input = (Int32(setting.bInterfaceNumber), endpoint.bEndpointAddress) }
                    } else if output == nil {
                        output = (Int32(setting.bInterfaceNumber), endpoint.bEndpointAddress)
                    }
                }
            }
        }
        guard let input, let output else {
            throw TegraError(.protocolViolation, "\(location): no bulk IN and OUT endpoint pair in the active configuration: not a Tegra boot ROM")
        }
        return (input.0, input.1, output.1)
    }

    public func bulkOut(_ bytes: ArraySlice<UInt8>, timeoutMilliseconds: Int) throws -> Int {
        guard let handle else { throw TegraError(.deviceGone, "\(location): already closed") }
        var buffer = Array(bytes)
        var transferred: Int32 = 0
        let result = libusb_bulk_transfer(handle, endpointOut, &buffer, Int32(buffer.count), &transferred,
                                          UInt32(timeoutMilliseconds))
        if result == LIBUSB_ERROR_TIMEOUT.rawValue && transferred > 0 { return Int(transferred) }
        guard result == 0 else {
            throw LibUSB.error(result, "write \(buffer.count) bytes to", location: location, node: nil,
                               timeoutMilliseconds: timeoutMilliseconds)
        }
        return Int(transferred)
    }

    public func bulkIn(maxLength: Int, timeoutMilliseconds: Int) throws -> [UInt8] {
        guard let handle else { throw TegraError(.deviceGone, "\(location): already closed") }
        var buffer = [UInt8](repeating: 0, count: maxLength)
        var transferred: Int32 = 0
        let result = libusb_bulk_transfer(handle, endpointIn, &buffer, Int32(maxLength), &transferred,
                                          UInt32(timeoutMilliseconds))
        guard result == 0 || (result == LIBUSB_ERROR_TIMEOUT.rawValue && transferred > 0) else {
            throw LibUSB.error(result, "read from", location: location, node: nil,
                               timeoutMilliseconds: timeoutMilliseconds)
        }
        return Array(buffer.prefix(Int(transferred)))
    }

    public func close() {
        if let handle {
            _ = libusb_release_interface(handle, interfaceNumber)
            libusb_close(handle)
            self.handle = nil
        }
        if let context {
            libusb_exit(context)
            self.context = nil
        }
    }
}

/// libusb return codes as `TegraError`s that say what to do.
enum LibUSB {
    static let udevRuleFile = "udev-rules/70-provision.rules"
    static let group = "provision"

    static func error(_ code: Int32, _ operation: String, location: String, node: String?,
                      timeoutMilliseconds: Int? = nil) -> TegraError {
        let name = String(cString: libusb_error_name(code))
        switch code {
        case LIBUSB_ERROR_ACCESS.rawValue:
            return TegraError(.permissionDenied,
                "no permission to \(operation) \(location)\(node.map { " (\($0))" } ?? ""): install \(udevRuleFile) "
                + "into /etc/udev/rules.d (it gives group \"\(group)\" read-write access to NVIDIA recovery devices), "
                + "run `udevadm control --reload && udevadm trigger`, and add this user to group \"\(group)\" — or run as root")
        case LIBUSB_ERROR_NO_DEVICE.rawValue, LIBUSB_ERROR_NOT_FOUND.rawValue:
            return TegraError(.deviceGone,
                "\(location) is gone (unplugged, reset or re-enumerated) during: \(operation) [\(name)]")
        case LIBUSB_ERROR_TIMEOUT.rawValue:
            return TegraError(.timeout,
                "\(location): no answer within \(timeoutMilliseconds ?? 0) ms to: \(operation) [\(name)]")
        case LIBUSB_ERROR_BUSY.rawValue:
            return TegraError(.usb(code),
                "\(location) is busy: another program (tegrarcm, another provision) has claimed it [\(name)]")
        default:
            return TegraError(.usb(code), "\(location): libusb failed to \(operation) it: \(name) (\(code))")
        }
    }
}
