fn main() {
    print!("{}", segment_core::api::crds_yaml());
}
