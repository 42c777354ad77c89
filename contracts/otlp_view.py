"""OTLP's `ExportTraceServiceRequest` with span and resource attributes read as maps.

With the upb protobuf runtime, walking a span's `repeated KeyValue` attributes
builds a Python wrapper object per attribute before its key can be read: about
half of the decoder's time on a typical GenAI span (a dozen attributes). A
protobuf map is written on the wire exactly like `KeyValue` (key = field 1,
value = field 2), so the same bytes parse into `map<string, AnyValue>`, whose
keys come out as plain strings and whose values are wrapped only when read.

The view's schema is derived here from the official descriptors, changing only
those two fields, so every other field is parsed and validated as before: a
payload the official class refuses, the view refuses. What a map changes:
attribute order is lost and a key repeated in one span (OTLP forbids it) keeps
its last value; `contracts.otlp` decodes without relying on order. And an entry
with a field besides key and value (OTLP 1.10's `KeyValue.key_strindex`, any
unknown field) is kept out of the map, as an unknown field of its span or
resource, where `repeated KeyValue` reads the attribute: `contracts.otlp`
(`_ExactAttributes`) reads such a span's or resource's attributes from the
official class.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

_PREFIX = "burnguard.otlp_view."
#: The files whose messages the view redefines; the common types (AnyValue, KeyValue, ...) stay.
_RENAMED = (resource_pb2, trace_pb2, trace_service_pb2)
_RENAMED_PACKAGES = tuple(module.DESCRIPTOR.package for module in _RENAMED)
_RENAMED_FILES = tuple(module.DESCRIPTOR.name for module in _RENAMED)
#: (package, message) whose `attributes` become a map
_MAP_ATTRIBUTES = {("opentelemetry.proto.trace.v1", "Span"), ("opentelemetry.proto.resource.v1", "Resource")}
_ANY_VALUE = "." + common_pb2.AnyValue.DESCRIPTOR.full_name


def _file_proto(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def _renamed_type(type_name: str) -> str:
    for package in _RENAMED_PACKAGES:
        if type_name.startswith(f".{package}."):
            return f".{_PREFIX}{type_name[1:]}"
    return type_name


def _rename_types(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type_name:
            field.type_name = _renamed_type(field.type_name)
    for nested in message.nested_type:
        _rename_types(nested)


def _attributes_as_map(message: descriptor_pb2.DescriptorProto, full_name: str) -> None:
    """`repeated KeyValue attributes` -> `map<string, AnyValue> attributes` (same wire format)."""
    (field,) = (f for f in message.field if f.name == "attributes")
    entry = message.nested_type.add(name="AttributesEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    entry.field.add(
        name="value", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL, type_name=_ANY_VALUE
    )
    field.type_name = f".{full_name}.AttributesEntry"


def _view_file(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = _file_proto(module)
    package = proto.package
    proto.name = f"burnguard/otlp_view/{proto.name}"
    proto.package = _PREFIX + package
    proto.ClearField("options")
    proto.dependency[:] = [
        f"burnguard/otlp_view/{name}" if name in _RENAMED_FILES else name for name in proto.dependency
    ]
    for message in proto.message_type:
        _rename_types(message)
        if (package, message.name) in _MAP_ATTRIBUTES:
            _attributes_as_map(message, f"{proto.package}.{message.name}")
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed_type(method.input_type)
            method.output_type = _renamed_type(method.output_type)
    return proto


def _request_class() -> type[Message]:
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: the official names stay untouched
    pool.Add(_file_proto(common_pb2))
    for module in _RENAMED:
        pool.Add(_view_file(module))
    name = _PREFIX + trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


#: Parses the bytes of an `ExportTraceServiceRequest`; `.resource_spans[i].scope_spans[j].spans[k]
#: .attributes` and `.resource_spans[i].resource.attributes` are `{key: AnyValue}` maps.
TraceRequestView = _request_class()


#: What `wire_schema` says of a field: its content must be UTF-8, or it may come packed.
UTF8, PACKABLE = "utf8", "packable"


def wire_schema() -> tuple[list[dict[int, str | int]], int]:
    """The schema upb parses `TraceRequestView` by, as data for the native check of whole
    messages (contracts/native/src/valid.rs): per message type (the request first), field
    number -> `UTF8` (a string), `PACKABLE` (a repeated scalar) or the index of its message
    type (a map's entry type included); scalars and bytes are left out (upb reads any value).
    And the number of `resource_spans`, which a request must hold (`otlp._parse_proto`).

    Derived from the descriptors, so the check follows the schema wherever the view does.
    """
    request = TraceRequestView.DESCRIPTOR
    index = {request.full_name: 0}
    order = [request]
    messages: list[dict[int, str | int]] = []
    while len(messages) < len(order):
        checks: dict[int, str | int] = {}
        for field in order[len(messages)].fields:
            sub = field.message_type
            if sub is not None and field.type == field.TYPE_MESSAGE:
                if sub.full_name not in index:
                    index[sub.full_name] = len(order)
                    order.append(sub)
                checks[field.number] = index[sub.full_name]
            elif field.type == field.TYPE_STRING:
                checks[field.number] = UTF8
            elif field.is_repeated and field.type not in (field.TYPE_BYTES, field.TYPE_GROUP):
                checks[field.number] = PACKABLE
        messages.append(checks)
    return messages, request.fields_by_name["resource_spans"].number
