mod helpers;
mod http;
mod library;
mod reliability;
